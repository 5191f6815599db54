//! A real headless browser for the dashboard tests: Debian's `chromium`,
//! driven over WebDriver by `chromedriver` (started on a loopback port, in
//! a process group of its own that is killed when dropped, the browser
//! with it) through fantoccini.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{STEP, free_port};

/// chromedriver and one browser session.
pub struct Browser {
    /// The WebDriver session.
    pub client: fantoccini::Client,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a headless chromium `width` × `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        use std::os::unix::process::CommandExt as _;
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver is installed (scripts/test.sh installs chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < STEP, "chromedriver did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ]}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("a chromium session");
        Browser { client, driver }
    }

    /// Starts a browser `width` × `height` (as [`Browser::start`]) and
    /// opens `url` in it; waits until the page shows `css`.
    pub async fn open(width: u32, height: u32, url: &str, css: &str) -> Browser {
        let browser = Browser::start(width, height).await;
        browser.client.goto(url).await.expect("the page loads");
        browser.eventually(css, || browser.has(css)).await;
        browser
    }

    /// Waits until `check` holds, for at most a test step; `what` says what
    /// never happened.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !check().await {
            assert!(started.elapsed() < STEP, "never: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Clicks the first element `css` selects.
    pub async fn click(&self, css: &str) {
        let element = self.client.find(fantoccini::Locator::Css(css)).await;
        element
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("{css} cannot be clicked: {e}"));
    }

    /// Types `text` into the first element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.client.find(fantoccini::Locator::Css(css)).await;
        element
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("{css} takes no text: {e}"));
    }

    /// Waits (at most a test step) until the text of `css` satisfies `check`;
    /// a failure says the text last seen there.
    pub async fn wait_for_text(&self, what: &str, css: &str, check: impl Fn(&str) -> bool) {
        let started = Instant::now();
        loop {
            let text = self.text(css).await;
            if text.as_deref().is_some_and(&check) {
                return;
            }
            assert!(started.elapsed() < STEP, "never: {what}; {css} showed {text:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Whether an element `css` selects is there.
    pub async fn has(&self, css: &str) -> bool {
        self.client.find(fantoccini::Locator::Css(css)).await.is_ok()
    }

    /// The text of the first element `css` selects, if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(group) = i32::try_from(self.driver.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.driver.wait();
    }
}
